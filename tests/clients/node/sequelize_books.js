// Sequelize 6 on node-postgres reading the np_ bookshop (tests/orm_models.py), for
// tests/test_clients_node.py. Owns: the three ways it loads books and authors, by `mode`: `lazy`
// (each author's books, one query per author), `include` (eager, one query), `per-book-author`
// (each book's author by findByPk, a many-to-one loaded row by row). Prints what it loaded.
const { Sequelize, DataTypes } = require('sequelize');

const [port, app, mode] = process.argv.slice(2);
const sequelize = new Sequelize('app', 'trust_user', null, {
  host: '127.0.0.1', port: Number(port), dialect: 'postgres', logging: false,
  dialectOptions: { application_name: app }, pool: { max: 1 },
});
const Author = sequelize.define('Author', { name: DataTypes.TEXT }, { tableName: 'np_authors', timestamps: false });
const Book = sequelize.define('Book', { title: DataTypes.TEXT, author_id: DataTypes.INTEGER }, { tableName: 'np_books', timestamps: false });
Author.hasMany(Book, { foreignKey: 'author_id', as: 'books' });

(async () => {
  let parents;
  let loaded = 0;
  if (mode === 'lazy') {
    parents = await Author.findAll({ order: [['id', 'ASC']] });
    for (const author of parents) loaded += (await author.getBooks({ order: [['id', 'ASC']] })).length;
  } else if (mode === 'include') {
    parents = await Author.findAll({ include: [{ model: Book, as: 'books' }], order: [['id', 'ASC']] });
    for (const author of parents) loaded += author.books.length;
  } else if (mode === 'per-book-author') {
    parents = await Book.findAll({ order: [['id', 'ASC']] });
    for (const book of parents) if (await Author.findByPk(book.author_id)) loaded += 1;
  } else {
    throw new Error(`unknown mode ${mode}`);
  }
  console.log(`${parents.length} ${loaded}`);
  await sequelize.close();
})();
